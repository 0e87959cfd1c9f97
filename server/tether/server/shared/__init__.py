"""Ideas several areas use: accounts, devices, digests, partners, what a
binding is to the others. Below the areas: it imports none of them."""
