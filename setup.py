"""sam3fast: a performance-first inference engine for SAM 3.

Triton kernels live in the top-level ``kernels/`` folder and install as ``sam3fast.kernels``
(package_dir mapping), so no top-level ``kernels`` module is installed.
"""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["sam3fast", "sam3fast.*"])
package_dir = {}
if os.path.isdir(os.path.join(here, "kernels")):
    packages.append("sam3fast.kernels")
    package_dir["sam3fast.kernels"] = "kernels"

setup(
    name="sam3fast",
    version="0.1.0",
    description="Fast inference engine for Meta's SAM 3 (same checkpoints, same outputs)",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists(os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"sam3fast": ["assets/*.gz", "assets/*.jpg", "assets/*.png"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "numpy>=1.26",
        "pillow",
        "pycocotools",
        "huggingface_hub",
    ],
    extras_require={
        "gpu": ["triton", "nvtx"],
        "video": ["opencv-python-headless"],
    },
    entry_points={"console_scripts": ["sam3fast=sam3fast.cli:main"]},
)
