"""Applications around a packaged model: the BentoML service, the MAP app, the reviewer demo."""
