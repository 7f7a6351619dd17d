"""transformers-videorefer: VideoRefer region-level video LLMs as a plug-in for Hugging Face transformers."""

from setuptools import setup

EXTRAS = {
    "video": ["av>=12", "pycocotools>=2.0.7"],
    "kernels": ["triton>=3.1"],
    "train": ["trl>=0.20", "peft>=0.13", "datasets>=3.0", "accelerate>=1.0", "pyyaml"],
    "eval": ["pycocoevalcap>=1.2"],
}
EXTRAS["dev"] = sorted(
    {dep for deps in EXTRAS.values() for dep in deps} | {"pytest>=8", "timm>=1.0", "nltk>=3.8"}
)

setup(
    name="transformers-videorefer",
    version="0.1.0",
    description="VideoRefer (and PixelRefer) region-level video LLMs for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "transformers_videorefer",
        "transformers_videorefer.kernels",
        "transformers_videorefer.evaluation",
        "transformers_videorefer.training",
    ],
    package_dir={"transformers_videorefer.kernels": "kernels"},
    package_data={"transformers_videorefer.evaluation": ["*.txt"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.2,<6",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "accelerate>=1.0",
        "peft>=0.13",
        "datasets>=3.0",
        "numpy",
        "pillow",
        "tqdm",
        "av>=12",
        "pycocotools>=2.0.7",
        "pyyaml",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["videorefer=transformers_videorefer.cli:main"]},
)
