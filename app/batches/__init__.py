"""Running Batch API batches in the API server process: the runner (an asyncio task beside the engine), its
database side (claims, fenced progress, the output files)."""
