"""Administration: partners, preset services, credentials."""
