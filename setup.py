"""Installs `gemma_mtp_jax`; `pip install -e '.[test]'` is the supported developer install.

The presets in configs/ are plain ml_collections files loaded by path (not a package).
`gemma_mtp_jax.presets` finds them in the checkout; for a non-editable install they are also copied to
<prefix>/share/gemma_mtp_jax/configs, the second place it looks.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

setup(
    name="gemma_mtp_jax",
    version="0.1.0",
    description="Train Gemma 4 with its multi-token-prediction assistant drafter in JAX/Flax; "
                "export HF safetensors.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gemma_mtp_jax*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax",
        "orbax-checkpoint",
        # Gemma 4 configs/weights layout (per_layer_config, gemma4_assistant) as of 5.23.
        "transformers>=5.23,<5.24",
        "datasets",
        "safetensors",
        "ml_collections",
        "sentencepiece",
        "absl-py",
        "tqdm",
        "numpy",
        "tensorboardX",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        # torch only for the HF parity tests; the CPU wheel 2.13.0+cpu satisfies this pin.
        # libtpu (jax[tpu]) too: the AOT test compiles for a TPU topology on the CPU (no TPU needed).
        # pytest-xdist: pytest.ini runs the suite on two worker processes.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "jax[tpu]==0.10.2"],
        # gcsfs: orbax (through etils.epath) reaches gs:// checkpoint directories with it.
        "tpu": ["jax[tpu]==0.10.2", "gcsfs"],
    },
    data_files=[("share/gemma_mtp_jax/configs",
                 sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")))],
)
