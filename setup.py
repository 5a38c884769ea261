from setuptools import find_packages, setup

setup(
    name="megatron_tst",
    version="0.1.0",
    description="Token Superposition Training (arXiv 2605.06546) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tst", "megatron_tst.*"]),
    # On CPU-only machines install torch==2.13.0 first (the README and .ci/run do), so that resolving
    # this range never pulls a CUDA build. Never add PyPI's "apex": it is an unrelated package.
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "psutil",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist==3.8.0",  # xdist: make test's two workers
                 "transformers", "tokenizers", "matplotlib",  # matplotlib: tools/tst_report.py
                 "lm-eval", "accelerate",  # the lm-eval harness test (accelerate: its HF model class)
                 "wandb",  # tests/test_wandb.py, offline
                 "tiktoken"],  # the TikTokenizer test (a hand-made vocabulary, offline)
        "hf": ["transformers", "safetensors", "tokenizers"],
        "te": ["transformer-engine[pytorch]"],
        "plots": ["matplotlib"],
        "tb": ["tensorboard"],
        "wandb": ["wandb"],  # --wandb-project (tested with 0.31.0 offline)
        "tiktoken": ["tiktoken"],  # --tokenizer-type TikTokenizer
    },
)
