"""Data sources for genie: each turns raw material (video files, a game, robot episodes) into shards."""
