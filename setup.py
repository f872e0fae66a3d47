from setuptools import find_packages, setup

setup(
    name="deepcd-petsc",
    version="0.1.0",
    description="Deep Conjugate Direction Method (DCDM) as PETSc KSP/PC Python contexts",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["deepcd_petsc", "deepcd_petsc.*"]),
    package_data={"deepcd_petsc": ["models/*.pt", "models/*.md", "kernels.c"]},
    # petsc4py and mpi4py are deliberately not listed: they must match the
    # PETSc/MPI of the machine (Debian packages, a cluster module, spack or
    # conda) and pip must never try to build its own.
    install_requires=["numpy", "scipy", "torch>=2.0", "tqdm", "matplotlib"],
    # triton: the GPU kernels (CUDA builds of torch bring it along); the
    # tests run them through its interpreter
    extras_require={"test": ["pytest", "triton"], "gpu": ["triton"]},
    entry_points={"console_scripts": ["deepcd = deepcd_petsc.cli:main"]},
)
