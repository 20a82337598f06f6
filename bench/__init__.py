"""corral's benchmark (python bench/run.py): a package so that its sections share the
systems, the measures and the tables."""
