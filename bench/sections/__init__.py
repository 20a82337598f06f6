"""One module per section of bench/run.py, each with run(opts, ctx, report): it measures
(bench/measure.py, on systems of bench/systems.py) and hands the figures to its table
in bench/report.py."""
