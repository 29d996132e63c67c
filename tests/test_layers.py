"""The package's import graph: no module imports, directly or through others, a module that
imports it back. The compiled engine is invisible to the graph (it is not a Python file), so
`from cllm_cli import _engine` shows as an import of the package root, which is left out."""
import grimp


def import_graph():
    graph = grimp.build_graph("cllm_cli")
    for importer in graph.find_modules_that_directly_import("cllm_cli"):
        graph.remove_import(importer=importer, imported="cllm_cli")
    for imported in graph.find_modules_directly_imported_by("cllm_cli"):
        graph.remove_import(importer="cllm_cli", imported=imported)
    return graph


def test_no_module_is_part_of_an_import_cycle():
    graph = import_graph()
    cycles = sorted((a, b) for a in graph.modules
                    for b in graph.find_modules_directly_imported_by(a)
                    if graph.chain_exists(importer=b, imported=a))
    assert cycles == []


def test_the_graph_is_read():
    """The premise: the graph holds the package's modules and their imports."""
    graph = import_graph()
    assert "cllm_cli.training.loop" in graph.modules
    assert "cllm_cli.training.trainer" in graph.find_modules_directly_imported_by(
        "cllm_cli.training.loop")
