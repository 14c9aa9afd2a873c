"""Built-in tasks; each is registered under the `svf_rl.tasks` entry-point group."""
