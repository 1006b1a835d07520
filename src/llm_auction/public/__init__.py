"""The public side: what an ad platform owns (catalog, profiles, request log, feedback), as files."""
