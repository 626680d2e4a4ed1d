"""Training data, lowest module first: tokenizer (Gemma 4's or a tiny one), chat (one example ->
tokens + loss mask), corpus (the local no-download corpus), sources (datasets + held-out split),
packing (mixture, packed rows, the resumable iterator), pipeline (data configs -> iterators).
See `pipeline` for the whole flow."""
