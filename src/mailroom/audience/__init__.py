"""The audience: extract it from the users database, validate it, or generate a sample one."""
