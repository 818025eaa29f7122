"""diffplan: decision-making and planning with diffusion models.

Import the parts you need (``diffplan.data``, ``diffplan.diffusion``, ``diffplan.policies``, ...);
``diffplan.load_policy`` is here for convenience.
"""
__version__ = "0.1.0"


def _offscreen_gl() -> None:
    """Let MuJoCo render offscreen (eval videos) where there is no display: unless MUJOCO_GL is
    set, use EGL, or OSMesa where EGL is missing. It must be set before mujoco is imported."""
    import os
    import sys
    from ctypes.util import find_library

    if sys.platform != "linux" or os.environ.get("MUJOCO_GL") or os.environ.get("DISPLAY") \
            or os.environ.get("WAYLAND_DISPLAY"):
        return
    for library, backend in (("EGL", "egl"), ("OSMesa", "osmesa")):
        if find_library(library):
            os.environ["MUJOCO_GL"] = backend
            return


_offscreen_gl()


def load_policy(path, device="cpu", task=None):
    """Rebuild any policy from a checkpoint folder; see :func:`diffplan.policies.load_policy`."""
    from diffplan.policies import load_policy as _load

    return _load(path, device=device, task=task)
