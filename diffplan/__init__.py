"""diffplan: decision-making and planning with diffusion models.

Import the parts you need (``diffplan.data``, ``diffplan.diffusion``, ``diffplan.policies``, ...);
``diffplan.load_policy`` is here for convenience.
"""
__version__ = "0.1.0"


def load_policy(path, device="cpu", task=None):
    """Rebuild any policy from a checkpoint folder; see :func:`diffplan.policies.load_policy`."""
    from diffplan.policies import load_policy as _load

    return _load(path, device=device, task=task)
