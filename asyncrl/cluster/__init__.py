"""Where the roles run: the placement plan (pure, no Ray) and the Ray backend."""
