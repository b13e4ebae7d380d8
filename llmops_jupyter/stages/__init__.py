"""One module per lifecycle stage. Modules here must import only the standard library at top level (plus this
package): command discovery imports all of them to build `%llmops?` help, and `%load_ext` must stay cheap."""
