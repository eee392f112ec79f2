"""One encoder, many losses: networks, objectives, views, the training loop, readouts, run folders."""
