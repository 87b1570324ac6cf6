"""lowrank-tools: post-hoc low-rank adapters.

Extract LoRA factors from a base and a fully fine-tuned checkpoint, resize and merge adapters
without densifying them, bake them into full weights, and analyze singular-value spectra.
The command line (``lowrank-tools``) is a thin shell over these functions.
"""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule, ModuleKind  # noqa: E402
from .apply import apply  # noqa: E402
from .io.checkpoint import open_checkpoint  # noqa: E402
from .extract.streaming import extract  # noqa: E402
from .io.formats import load_adapter, save_adapter  # noqa: E402
from .linalg.svd import Method, RankRule  # noqa: E402
from .merge import merge  # noqa: E402
from .resize import resize  # noqa: E402

__all__ = ["Adapter", "LoraModule", "ModuleKind", "Method", "RankRule", "extract", "load_adapter", "open_checkpoint",
           "save_adapter", "resize", "merge", "apply", "__version__"]
