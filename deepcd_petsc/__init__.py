"""deepcd_petsc: the Deep Conjugate Direction Method (Kaneda et al., ICML
2023) as PETSc solver components.

Heavy modules (torch, petsc4py) load on first use, so
`-ksp_python_type deepcd_petsc.DCDM` and `import deepcd_petsc` stay cheap.
"""
__version__ = "0.1.0"

_LAZY = {"DCDM": ".ksp", "NetworkPC": ".pc", "set_flags": ".context", "set_stencil": ".context"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(_LAZY[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'deepcd_petsc' has no attribute {name!r}")
