"""sam3fast: a performance-first inference engine for SAM 3.

Triton kernels live in the top-level ``kernels/`` folder and install as ``sam3fast.kernels``
(package_dir mapping), so no top-level ``kernels`` module is installed.

Native ops (``csrc/``) build into ``sam3fast._C``: the CPU ops always, the CUDA kernels only when
torch is a CUDA build and a CUDA toolkit is found. The extension must be compiled against the torch it
will run with: the install target's torch. ``pip install --no-build-isolation -e .`` sees it
directly; under pip's default build isolation setup.py looks it up in the target environment's
site-packages (``site.getsitepackages()``, which the isolated build hides). Without any torch the
package still installs, without ``sam3fast._C`` (``python -m sam3fast.info`` says why).
Build switches: SAM3FAST_BUILD_NATIVE=0 skips ``sam3fast._C``, SAM3FAST_BUILD_CUDA=0 leaves out
the CUDA kernels.
"""

import os
import site
import sys

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))

# Codes for sam3fast._C.CUDA_SKIP (spelled out by sam3fast/info.py).
CUDA_SKIP_DISABLED, CUDA_SKIP_CPU_TORCH, CUDA_SKIP_NO_TOOLKIT = 1, 2, 3


def import_target_torch():
    """The install target's torch, or None. pip's build isolation removes the target's
    site-packages from sys.path (and may offer no torch, or another one): put them back, last."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    hidden = [p for p in site.getsitepackages() if p not in sys.path and os.path.isdir(os.path.join(p, "torch"))]
    if not hidden:
        return None
    sys.path.extend(hidden)
    try:
        import torch
    except ImportError:
        return None
    print(f"sam3fast: building sam3fast._C against the install target's torch {torch.__version__} ({hidden[0]})")
    return torch


def native_extensions():
    """(ext_modules, cmdclass) for sam3fast._C, or ([], {}) when it cannot or should not be built."""
    if os.environ.get("SAM3FAST_BUILD_NATIVE", "1") == "0":
        print("sam3fast: SAM3FAST_BUILD_NATIVE=0, not building sam3fast._C")
        return [], {}
    torch = import_target_torch()
    if torch is None:
        print(
            "sam3fast: WARNING: no torch found for the build, so the native ops (sam3fast._C) are "
            "NOT built. Install torch first, then `pip install --no-build-isolation -e .`."
        )
        return [], {}
    from torch.utils import cpp_extension

    if os.environ.get("SAM3FAST_BUILD_CUDA", "1") == "0":
        cuda_skip = CUDA_SKIP_DISABLED
    elif torch.version.cuda is None:
        cuda_skip = CUDA_SKIP_CPU_TORCH
    elif cpp_extension.CUDA_HOME is None:
        cuda_skip = CUDA_SKIP_NO_TOOLKIT
    else:
        cuda_skip = 0
    sources = ["csrc/bindings.cpp", "csrc/cpu/assignment.cpp", "csrc/cpu/mask_iou.cpp"]
    # -g0: the Python CFLAGS carry -g, which makes the torch headers in bindings.cpp build slower.
    kwargs = dict(
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=[("SAM3FAST_CUDA_SKIP", str(cuda_skip))],
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]},
    )
    if cuda_skip == 0:
        kwargs["define_macros"].append(("SAM3FAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension("sam3fast._C", sources + ["csrc/cuda/assignment.cu", "csrc/cuda/mask_iou.cu"], **kwargs)
    else:
        del kwargs["extra_compile_args"]["nvcc"]
        ext = cpp_extension.CppExtension("sam3fast._C", sources, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()

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
    package_data={"sam3fast": ["assets/*.gz", "assets/*.jpg", "assets/*.png", "assets/*.mp4"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "numpy>=1.26",
        "pillow",
        "pycocotools",
        "huggingface_hub",
        "scipy",  # connected components for the official hole filling
        "opencv-python-headless",  # video decoding and resizing exactly as the official loader
        "tqdm",  # progress bars on propagation, where the official draws them
    ],
    extras_require={
        "gpu": ["triton", "nvtx"],
    },
    entry_points={"console_scripts": ["sam3fast=sam3fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
