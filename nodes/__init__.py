"""ComfyUI adapters over `emocast_core` (node classes are registered here as they land)."""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
