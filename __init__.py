"""ComfyUI entry point of the EmoCAST pack.

Importing this module must stay cheap: no model is loaded and nothing is downloaded here; the node
classes import the library lazily when they run.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
