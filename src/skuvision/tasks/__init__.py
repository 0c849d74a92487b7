"""One module per task (`from skuvision.tasks.train import train`). Nothing is imported here: a command
loads only its own task's libraries, and `import skuvision.cli` loads none of torch's."""
