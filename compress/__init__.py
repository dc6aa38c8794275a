"""compress: Minitron-style compression of Hugging Face causal LMs.

Prune width (MLP neurons, attention heads, hidden channels) and depth (layers) by activation importance,
recover quality by distilling from the teacher, and export a standard student (safetensors that
``AutoModelForCausalLM.from_pretrained`` loads with no custom code, and ONNX that onnxruntime runs).
"""

from . import evaluate
from .api import compress, load_report, load_teacher, save_student, smollm2_gguf_path
from .corpus import CorpusReport, SelectionReport, generate_corpus, select_by_difference
from .distillation import DistillConfig, DistillError, DistillReport, distill
from .distillation.data import distillation_windows
from .distillation.teacher_cache import CacheReport, TeacherCache, build_teacher_cache
from .errors import (
    CheckpointError,
    CompressError,
    ConfigError,
    DataError,
    OutputExistsError,
    PluginError,
    TargetError,
    UnsupportedModelError,
)
from .exporters import ExportError, ExportReport, export
from .models import DecoderAdapter, register_adapter, supported_families
from .plugin_api import AxisPlugin, ImportancePlugin, PruneContext, ReconstructPlugin
from .pruning.calibrate import Calibration, Importance
from .pruning.config import CalibrationConfig, PlanConfig, SearchConfig, Target
from .pruning.prune import prune, score_importance
from .pruning.reconstruct import ReconstructReport  # the function is compress.pruning.reconstruct.reconstruct
from .pruning.search import SearchResult, search_shapes
from .pruning.shape import ModelShape
from .recipe import DataSettings, ExportSettings, Recipe
from .registry import get_plugin, list_plugins, register_plugin
from .report import PruneReport, Result
from .version import __version__

__all__ = [
    "AxisPlugin",
    "CacheReport",
    "Calibration",
    "CalibrationConfig",
    "CheckpointError",
    "CompressError",
    "ConfigError",
    "CorpusReport",
    "DataError",
    "DataSettings",
    "ExportSettings",
    "Recipe",
    "SelectionReport",
    "generate_corpus",
    "select_by_difference",
    "DecoderAdapter",
    "DistillConfig",
    "DistillError",
    "DistillReport",
    "ExportError",
    "ExportReport",
    "ImportancePlugin",
    "Importance",
    "ModelShape",
    "OutputExistsError",
    "PlanConfig",
    "PluginError",
    "PruneContext",
    "PruneReport",
    "ReconstructPlugin",
    "ReconstructReport",
    "Result",
    "SearchConfig",
    "SearchResult",
    "Target",
    "TeacherCache",
    "build_teacher_cache",
    "distillation_windows",
    "TargetError",
    "UnsupportedModelError",
    "__version__",
    "compress",
    "distill",
    "distillation",
    "exporters",
    "evaluate",
    "export",
    "get_plugin",
    "list_plugins",
    "load_report",
    "load_teacher",
    "prune",
    "register_adapter",
    "register_plugin",
    "save_student",
    "score_importance",
    "search_shapes",
    "smollm2_gguf_path",
    "supported_families",
]
