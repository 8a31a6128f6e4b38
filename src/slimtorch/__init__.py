"""slimtorch: make PyTorch models smaller and faster without changing what they compute.

    masks = slimtorch.compute_masks(model, config_list, example_inputs=x)   # pruning phase (pure)
    slimtorch.apply_masks_(model, masks)                                    # masked: same size
    print(slimtorch.report(model, x).to_markdown())
"""

from slimtorch import (
    integrations,  # noqa: F401  (registers integrations with third-party libraries lazily)
    recover,  # noqa: F401  (registers the training loop the pruning methods' Evaluator runs)
)
from slimtorch.compact import compact_
from slimtorch.config import Granularity, PruneTarget, load_config_list, parse_config_list
from slimtorch.errors import (
    CheckpointError,
    CompactionError,
    ConfigError,
    ExportError,
    NoMatchError,
    SlimError,
    SlimWarning,
    TraceError,
    UnsupportedOpError,
)
from slimtorch.io import load_masks, save_masks
from slimtorch.prune import (
    DynamicSparsity,
    Evaluator,
    GradualPruner,
    LotteryTicket,
    Schedule,
    apply_masks_,
    collect_stats,
    compute_masks,
    get_masks,
    is_masked,
    remove_masks_,
    sensitivity_analysis,
)
from slimtorch.quant import QuantConfig, quant_info, quantize, quantize_
from slimtorch.report import Report, report, sparsity_table
from slimtorch.select import select_modules
from slimtorch.version import VERSION

__version__ = VERSION

__all__ = [
    "CheckpointError",
    "CompactionError",
    "ConfigError",
    "DynamicSparsity",
    "Evaluator",
    "ExportError",
    "GradualPruner",
    "Granularity",
    "LotteryTicket",
    "NoMatchError",
    "PruneTarget",
    "QuantConfig",
    "Report",
    "Schedule",
    "SlimError",
    "SlimWarning",
    "TraceError",
    "UnsupportedOpError",
    "__version__",
    "apply_masks_",
    "collect_stats",
    "compact_",
    "compute_masks",
    "get_masks",
    "is_masked",
    "load_config_list",
    "load_masks",
    "parse_config_list",
    "quant_info",
    "quantize",
    "quantize_",
    "remove_masks_",
    "report",
    "save_masks",
    "select_modules",
    "sensitivity_analysis",
    "sparsity_table",
]
