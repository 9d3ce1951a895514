"""Exports: the shared pipeline, one module per target format (matching ``writers/``), batch mode, the conversion
report and the model cards."""
