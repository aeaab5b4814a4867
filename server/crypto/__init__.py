"""Key management and authenticated encryption: KEK keyring, per-account data keys, AES-256-GCM with AAD."""
