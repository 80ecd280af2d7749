"""Framework integrations (transformers, ...). Each module imports its framework only inside
functions, so importing it is cheap and works without the framework installed."""
