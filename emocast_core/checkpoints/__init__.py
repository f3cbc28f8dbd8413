"""EmoCAST weights files: layouts and their reports, reading and writing, the networks' file, inspection.

Layers, bottom-up: `layout` (names and shapes, pure) -> `files` (reading and writing any weights file) ->
`net_file` (the EmoCAST networks: expected layout, strict check, loading, conversion) and `inspection`.
"""
from .files import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES, CheckpointError, load_state_dict,
                    parse_dtype, read_layout, read_metadata, read_safetensors_header, save_safetensors)
from .inspection import LayoutSummary, ModuleStats, format_summary, summarize_layout
from .layout import KeyGroup, Layout, LayoutReport, TensorSpec, compare_layout, format_report, group_keys
from .net_file import (CONFIG_METADATA_KEY, check_layout, convert, describe_config, expected_layout, load_net,
                       resolve_config)

__all__ = ["CONFIG_METADATA_KEY", "CheckpointError", "KeyGroup", "Layout", "LayoutReport", "LayoutSummary",
           "ModuleStats", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "TensorSpec", "WEIGHT_SUFFIXES", "check_layout",
           "compare_layout", "convert", "describe_config", "expected_layout", "format_report", "format_summary",
           "group_keys", "load_net", "load_state_dict", "parse_dtype", "read_layout", "read_metadata",
           "read_safetensors_header", "resolve_config", "save_safetensors", "summarize_layout"]
