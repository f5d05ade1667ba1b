"""Pipeline stages as software-defined assets, one module per stage."""
