"""Built-in preset files (TOML data only); installed as the package edm_toolkit.preset_data."""
