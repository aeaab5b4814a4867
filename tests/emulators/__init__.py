"""Local emulators of providers' documented HTTP APIs, served over HTTPS on 127.0.0.1 for tests."""
