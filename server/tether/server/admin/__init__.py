"""Partners, their preset services, and credentials."""
