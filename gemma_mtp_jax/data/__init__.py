"""Training data, lowest module first: errors (DataError), tokenizer (Gemma 4's or a tiny one),
images (image values, Gemma 4's image processor and processor), schemas (the registry of data
schemas: a row's columns -> chat turns), chat (one example -> tokens + loss mask + pixel slots),
corpus / vision_qa (the local no-download data), sources (datasets + held-out split), packing
(mixture, packed rows, the resumable iterator), pipeline (data configs -> iterators). See
`pipeline` for the whole flow."""
