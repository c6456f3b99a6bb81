"""What every service builds on. Imports no service."""
