"""The container image tests (a package, so that its conftest does not displace the other
directories' `conftest` modules when several test directories are collected together)."""
