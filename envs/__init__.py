"""Task cards, expert and behavior controllers, dataset recipes (installed as diffplan.envs).

Task modules (`maze`, `locomotion`) register their cards when first looked up, so importing this
package stays light.
"""

from diffplan.envs.tasks import (
    TaskCard,
    UnknownTaskError,
    get_task,
    list_tasks,
    register_task,
)

__all__ = ["TaskCard", "UnknownTaskError", "get_task", "list_tasks", "register_task"]
