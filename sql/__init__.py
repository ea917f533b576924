"""SQL shipped with reembed (read with importlib.resources; see reembed.queries)."""
