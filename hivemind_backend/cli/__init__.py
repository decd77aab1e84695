"""Command-line tools: hivemind-dht (run_dht.py)."""
