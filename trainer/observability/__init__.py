"""What a person watches: metrics.jsonl and W&B (`tracking`), what a logged line summarises
(`metrics`), throughput/MFU/memory (`perf`), the PNG dashboard (`dashboard`), sample generations at
each eval (`generation`), and the rule that secrets are never written anywhere (`redaction`)."""
