import click

@click.group()
def main():
    """avsprep"""
