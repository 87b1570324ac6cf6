"""Files: the only layer that opens paths. Checkpoint readers (:mod:`.checkpoint`, :mod:`.safetensors`, torch
pickles in :mod:`.pickles`), no-clobber renames (:mod:`.rename`), an apply folder's configs (:mod:`.model_folder`),
what a base config says (:mod:`.base_model`), the diffusers class an adapter records of it
(:mod:`.base_class`) and where an adapter module lands in a base (:mod:`.base_lookup`),
outputs that stand or fall together (:mod:`.outputs`, with what ``--force`` may replace in :mod:`.replaceable`,
and the streaming writers in :mod:`.atomic`), the adapter formats (:mod:`.peft`, diffusers' pipeline files in :mod:`.diffusers_lora`, :mod:`.kohya` and its name
tables, LyCORIS LoHa/LoKr/Tucker in :mod:`.lycoris`, DoRA magnitudes and tensor deltas in :mod:`.adapter_extras`,
:mod:`.formats` to detect and dispatch), the layer plan of a checkpoint pair (:mod:`.layers`), the background
reader (:mod:`.prefetch`), and the inputs of evaluate (texts in :mod:`.texts`, a model folder's config in
:mod:`.model_config`).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ..linalg.lazy import lazy_exports

if _TYPE_CHECKING:  # the same names, imported for type checkers and tests/test_architecture.py's layer graph
    from .safetensors import SAFETENSORS_DTYPES, DTYPE_NAMES, SafetensorsFile, parse_header
    from .json_input import (MAX_DEPTH, load_json, check_depth, type_name, get_mapping, get_str, get_int, get_number, get_bool,
                             get_str_list, get_str_map)
    from .patterns import (MAX_PATTERN, MAX_DEGREE, MAX_WORK, check_pattern, check_patterns, safe_search, peft_key_matches,
                           peft_pattern_value)
    from .rename import rename_noreplace
    from .outputs import (OutputTransaction, atomic_output, check_output, check_replaceable, foreign_entries, temp_path,
                          TMP_MARK, write_files, rendered)
    from .replaceable import COPIED_KEY
    from .atomic import parse_size, ShardedWriter, header_bound, write_safetensors, check_finite_output, all_finite
    from .pickles import TensorDict, load_pickle
    from .fp8 import (FP8_DTYPES, WEIGHT_SCALES, DEQUANTIZED_DTYPE, WRITE_DTYPE, DEFAULT_BLOCK, DequantizedSource,
                      JoinedSource, dequantizing, strip_quantization_metadata, dequantize, block_size_from_config)
    from .hub import is_hub_id, hub_cache_dir, hub_offline, resolve_input, resolve_inputs
    from .ldm_names import LDM_PREFIXES, VAE_PREFIX, VAE_PREFIXES, ldm_split, is_vae, openclip_to_clip
    from .openclip import OPENCLIP_TOWERS, SplitQKVSource, splitting, fused_rows
    from .checkpoint import Checkpoint, open_checkpoint, as_checkpoint, Pairing, pair_tensors
    from .kohya_names import (COMPONENT_PREFIXES, KOHYA_PREFIXES, kohya_key, split_prefix, check_prefix, guess_module_name,
                              match_keys, is_text_encoder_prefix, architecture_names, dotted_module_name)
    from .architectures import (Naming, Rule, Architecture, ARCHITECTURES, Detected, detect_architecture, body_of,
                                TRANSFORMER, architecture_named, needs_base)
    from .arch_convert import to_original, to_diffusers, for_format, row_sizes, to_base_naming, to_common_naming
    from .arch_checkpoint import FusedSource, in_original_naming, original_layout
    from .diffusers_judge import PIPELINES, COMPONENTS, pipeline_for, trace_modules, ldm_unet_keys, LDM_WORKAROUND
    from .base_model import (task_type, base_model_reference, WORD_EMBEDDINGS, tied_head_name, tied_embedding,
                             TiedHead, find_tied_heads, tied_head_module)
    from .base_lookup import BaseIndex
    from .base_class import BASE_CLASS_KEY, base_class, base_class_metadata, base_class_from_metadata
    from .peft import (CONFIG_NAME, WEIGHTS_NAME, is_peft_folder, read_peft, write_peft, peft_config, peft_state_dict,
                       collect_factors, build_module, lora_keys_seen, pattern_value, peft_folder_parts,
                       modules_from_config, file_factors, is_saved_whole, key_saved_whole)
    from .diffusers_lora import (DIFFUSERS_NAME, DIFFUSERS_COMPONENTS, is_diffusers_adapter, pipeline_components,
                                 write_diffusers, read_peft_file, lone_component)
    from .kohya import NAMES_KEY, is_kohya_keys, read_kohya, write_kohya, kohya_state_dict, resolve_module_names
    from .lycoris import (STRUCTURED_SUFFIXES, is_lycoris_keys, read_lycoris, read_peft_lycoris, structured_module,
                          PLACEHOLDER_ALPHA, fit_kernels)
    from .adapter_extras import (split_extras, attach_extras, ExtrasView, check_peft_extras, peft_extras, peft_extras_config,
                                 kohya_extras)
    from .formats import (AdapterFormat, load_adapter, save_adapter, detect_format, describe_adapter, describe_modules,
                          check_target, output_format, fit_format, fit_all, left_out_warning,
                          select_modules, LEFT_OUT, LEFT_OUT_WHOLE, check_kohya_target, in_output_naming)
    from .layers import (FACTORABLE_DTYPES, check_factorable, layer_kind, compile_filters, matches, select_layers,
                         relative_change, LayerPlan,
                         plan_layers, conv1d_rule, kohya_refuses_conv1d, WHOLE_LEAVES, FUSED_EXPERTS, GROUPED,
                         grouped_warning)
    from .module_names import (ModelNames, model_names, in_model_names, in_checkpoint_names, with_aliases,
                               fold_aliases, checkpoint_index, CHECKPOINT_NAMES_KEY, names_metadata,
                               names_from_metadata)
    from .prefetch import prefetch
    from .texts import read_texts, TEXT_SUFFIXES
    from .model_config import read_model_config, CONV1D_LAYERS, CONV1D_LEAVES, conv1d_leaves, pipeline_evidence, grouped_convs
    from .model_folder import config_files, copy_config_files, shard_stem, rename_stem, QUANTIZATION_FIELDS
    from .consumer_keys import (Consumer, Role, split_key, key_accepted, ROLES, KOHYA_LIKE_PREFIXES,
                                unknown_to_architecture)
    from .calibration import FORMAT_KEY, InputStats, CalibrationStats, read_calibration, write_calibration
    from .models import (ModelKind, require_transformers, model_kind, load_model, load_tokenizer, token_ids, padded_batches,
                         Denoiser, find_denoiser, require_diffusers, load_denoiser, is_conv1d_layer)

from .prefetch import prefetch  # bound now: named like its module, or needed at once

# public name -> the module that defines it, imported on first use (PEP 562): importing one module of this package
# does not import the others (the command line's info reads an adapter without the SVD machinery)
_EXPORTS = {name: module for module, names in {
    ".safetensors": ("SAFETENSORS_DTYPES", "DTYPE_NAMES", "SafetensorsFile", "parse_header",),
    ".json_input": ("MAX_DEPTH", "load_json", "check_depth", "type_name", "get_mapping", "get_str", "get_int", "get_number",
                  "get_bool", "get_str_list", "get_str_map",),
    ".patterns": ("MAX_PATTERN", "MAX_DEGREE", "MAX_WORK", "check_pattern", "check_patterns", "safe_search",
                "peft_key_matches", "peft_pattern_value",),
    ".rename": ("rename_noreplace",),
    ".outputs": ("OutputTransaction", "atomic_output", "check_output", "check_replaceable", "foreign_entries", "temp_path",
               "TMP_MARK", "write_files", "rendered",),
    ".replaceable": ("COPIED_KEY",),
    ".atomic": ("parse_size", "ShardedWriter", "header_bound", "write_safetensors", "check_finite_output", "all_finite",),
    ".pickles": ("TensorDict", "load_pickle",),
    ".fp8": ("FP8_DTYPES", "WEIGHT_SCALES", "DEQUANTIZED_DTYPE", "WRITE_DTYPE", "DEFAULT_BLOCK", "DequantizedSource",
             "JoinedSource", "dequantizing", "strip_quantization_metadata", "dequantize", "block_size_from_config",),
    ".hub": ("is_hub_id", "hub_cache_dir", "hub_offline", "resolve_input", "resolve_inputs",),
    ".ldm_names": ("LDM_PREFIXES", "VAE_PREFIX", "VAE_PREFIXES", "ldm_split", "is_vae", "openclip_to_clip",),
    ".openclip": ("OPENCLIP_TOWERS", "SplitQKVSource", "splitting", "fused_rows",),
    ".checkpoint": ("Checkpoint", "open_checkpoint", "as_checkpoint", "Pairing", "pair_tensors",),
    ".kohya_names": ("COMPONENT_PREFIXES", "KOHYA_PREFIXES", "kohya_key", "split_prefix", "check_prefix", "guess_module_name",
                   "match_keys", "is_text_encoder_prefix", "architecture_names", "dotted_module_name",),
    ".architectures": ("Naming", "Rule", "Architecture", "ARCHITECTURES", "Detected", "detect_architecture", "body_of",
                     "TRANSFORMER", "architecture_named", "needs_base",),
    ".arch_convert": ("to_original", "to_diffusers", "for_format", "row_sizes", "to_base_naming", "to_common_naming"),
    ".arch_checkpoint": ("FusedSource", "in_original_naming", "original_layout"),
    ".diffusers_judge": ("PIPELINES", "COMPONENTS", "pipeline_for", "trace_modules", "ldm_unet_keys", "LDM_WORKAROUND"),
    ".base_model": ("task_type", "base_model_reference", "WORD_EMBEDDINGS", "tied_head_name", "tied_embedding",
                    "TiedHead", "find_tied_heads", "tied_head_module",),
    ".base_lookup": ("BaseIndex",),
    ".base_class": ("BASE_CLASS_KEY", "base_class", "base_class_metadata", "base_class_from_metadata"),
    ".peft": ("CONFIG_NAME", "WEIGHTS_NAME", "is_peft_folder", "read_peft", "write_peft", "peft_config",
            "peft_state_dict", "collect_factors", "build_module", "lora_keys_seen", "pattern_value", "peft_folder_parts",
            "modules_from_config", "file_factors", "is_saved_whole", "key_saved_whole",),
    ".module_names": ("ModelNames", "model_names", "in_model_names", "in_checkpoint_names", "with_aliases",
                      "fold_aliases", "checkpoint_index", "CHECKPOINT_NAMES_KEY", "names_metadata", "names_from_metadata",),
    ".diffusers_lora": ("DIFFUSERS_NAME", "DIFFUSERS_COMPONENTS", "is_diffusers_adapter", "pipeline_components",
                        "write_diffusers", "read_peft_file", "lone_component",),
    ".kohya": ("NAMES_KEY", "is_kohya_keys", "read_kohya", "write_kohya", "kohya_state_dict", "resolve_module_names",),
    ".lycoris": ("STRUCTURED_SUFFIXES", "is_lycoris_keys", "read_lycoris", "read_peft_lycoris", "structured_module",
               "PLACEHOLDER_ALPHA", "fit_kernels",),
    ".adapter_extras": ("split_extras", "attach_extras", "ExtrasView", "check_peft_extras", "peft_extras", "peft_extras_config",
                      "kohya_extras",),
    ".formats": ("AdapterFormat", "load_adapter", "save_adapter", "detect_format", "describe_adapter", "describe_modules",
               "check_target", "output_format", "fit_format", "fit_all", "left_out_warning",
               "select_modules", "LEFT_OUT", "LEFT_OUT_WHOLE", "check_kohya_target", "in_output_naming",),
    ".layers": ("FACTORABLE_DTYPES", "check_factorable", "layer_kind", "compile_filters", "matches", "select_layers",
              "relative_change", "LayerPlan",
              "plan_layers", "conv1d_rule", "kohya_refuses_conv1d", "WHOLE_LEAVES", "FUSED_EXPERTS", "GROUPED",
              "grouped_warning",),
    ".texts": ("read_texts", "TEXT_SUFFIXES",),
    ".model_config": ("read_model_config", "CONV1D_LAYERS", "CONV1D_LEAVES", "conv1d_leaves", "pipeline_evidence",
                      "grouped_convs",),
    ".model_folder": ("config_files", "copy_config_files", "shard_stem", "rename_stem", "QUANTIZATION_FIELDS",),
    ".consumer_keys": ("Consumer", "Role", "split_key", "key_accepted", "ROLES", "KOHYA_LIKE_PREFIXES",
                       "unknown_to_architecture",),
    ".calibration": ("FORMAT_KEY", "InputStats", "CalibrationStats", "read_calibration", "write_calibration",),
    ".models": ("ModelKind", "require_transformers", "model_kind", "load_model", "load_tokenizer", "token_ids",
              "padded_batches", "Denoiser", "find_denoiser", "require_diffusers", "load_denoiser", "is_conv1d_layer"),
}.items() for name in names}

__all__ = [*_EXPORTS, "prefetch"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
