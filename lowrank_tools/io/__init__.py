"""Files: the only layer that opens paths. Checkpoint readers (:mod:`.checkpoint`, :mod:`.safetensors`),
atomic outputs (:mod:`.atomic`), the adapter formats (:mod:`.peft`, :mod:`.kohya` and its name tables,
:mod:`.formats` to detect and dispatch), the layer plan of a checkpoint pair (:mod:`.layers`) and the
background reader (:mod:`.prefetch`).
"""

from __future__ import annotations

from .safetensors import SAFETENSORS_DTYPES, DTYPE_NAMES, SafetensorsFile, parse_header
from .atomic import atomic_output, check_output, parse_size, ShardedWriter, header_bound, write_safetensors
from .checkpoint import Checkpoint, open_checkpoint, as_checkpoint, Pairing, pair_tensors
from .kohya_names import (COMPONENT_PREFIXES, KOHYA_PREFIXES, kohya_key, split_prefix, check_prefix, guess_module_name,
    match_keys, is_text_encoder_prefix)
from .peft import (CONFIG_NAME, WEIGHTS_NAME, DIFFUSERS_NAME, DIFFUSERS_COMPONENTS, is_peft_folder,
    is_diffusers_adapter, read_peft, read_peft_file, write_peft, write_diffusers, peft_config, peft_state_dict,
    collect_factors, build_module, lora_keys_seen)
from .kohya import NAMES_KEY, is_kohya_keys, read_kohya, write_kohya, kohya_state_dict
from .formats import AdapterFormat, load_adapter, save_adapter, detect_format, describe_adapter, check_target
from .layers import (FACTORABLE_DTYPES, check_factorable, layer_kind, compile_filters, matches, select_layers,
    relative_change, TiedHead, find_tied_heads, tied_head_module, LayerPlan, plan_layers)
from .prefetch import prefetch

__all__ = [
    "SAFETENSORS_DTYPES", "DTYPE_NAMES", "SafetensorsFile", "parse_header", "atomic_output", "check_output",
    "parse_size", "ShardedWriter", "header_bound", "write_safetensors", "Checkpoint", "open_checkpoint",
    "as_checkpoint", "Pairing", "pair_tensors", "COMPONENT_PREFIXES", "KOHYA_PREFIXES", "kohya_key",
    "split_prefix", "check_prefix", "guess_module_name", "match_keys", "is_text_encoder_prefix", "CONFIG_NAME",
    "WEIGHTS_NAME", "DIFFUSERS_NAME", "DIFFUSERS_COMPONENTS", "is_peft_folder", "is_diffusers_adapter",
    "read_peft", "read_peft_file", "write_peft", "write_diffusers", "peft_config", "peft_state_dict",
    "collect_factors", "build_module", "lora_keys_seen", "NAMES_KEY", "is_kohya_keys", "read_kohya",
    "write_kohya", "kohya_state_dict", "AdapterFormat", "load_adapter", "save_adapter", "detect_format",
    "describe_adapter", "check_target", "FACTORABLE_DTYPES", "check_factorable", "layer_kind", "compile_filters",
    "matches", "select_layers", "relative_change", "TiedHead", "find_tied_heads", "tied_head_module", "LayerPlan",
    "plan_layers", "prefetch",
]
