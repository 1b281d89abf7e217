"""Small helpers every layer uses: one-line CLI errors, disk space, atomic files."""
