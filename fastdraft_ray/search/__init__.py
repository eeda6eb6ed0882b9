"""Hardware-aware draft architecture search with Ray Tune (space, latency model, trial, driver, report)."""
