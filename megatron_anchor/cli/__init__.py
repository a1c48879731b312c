"""Command-line tools: argparse, printing, plots and exit codes over typed library calls."""
