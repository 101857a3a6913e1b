"""Built-in analyzers: they read stored runs and write their metrics back."""
