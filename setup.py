from setuptools import find_packages, setup

setup(
    name="longwriter-engine",
    version="0.1.0",
    description="From-scratch SFT engine for Qwen2 / GLM-4 reproducing the LongWriter long-output recipe",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "engine",
            "engine.*",
            "kernels",
            "kernels.*",
            "data_gen",
            "data_gen.*",
            "evaluation",
            "evaluation.*",
        ]
    ),
    package_data={"data_gen": ["prompts/*.txt"], "evaluation": ["prompts/*.txt"], "engine": ["assets/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",  # the oldest tested (torch 2.11's); 3.9 too
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "tiktoken>=0.7",
        "numpy>=1.24",
        "tqdm>=4.66",
        "openai>=1.30",
        "pyyaml>=6.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "transformers>=4.46",
            "accelerate>=1.0",
            "ruff>=0.6",
            "matplotlib>=3.8",
        ],
    },
)
