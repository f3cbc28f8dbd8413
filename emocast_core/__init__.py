"""EmoCAST: emotional talking-head video generation (headless library; no ComfyUI imports here)."""
__version__ = "0.1.0"
