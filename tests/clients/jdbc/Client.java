// The client matrix scenario with pgjdbc (Debian's libpostgresql-jdbc-java), as a Java tool runs it.
// Arguments: JDBC URL, user, password (the JWT). Prints one "step<TAB>outcome" line per step, where the
// outcome is "ok<TAB>value" or "error<TAB>SQLSTATE<TAB>message", for tests/clients/test_jdbc.py to check.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;

public class Client {
    static void step(Connection conn, String name, String sql, Integer param) {
        try (PreparedStatement st = conn.prepareStatement(sql)) {
            if (param != null) {
                st.setInt(1, param);
            }
            if (st.execute()) {
                try (ResultSet rs = st.getResultSet()) {
                    rs.next();
                    System.out.println(name + "\tok\t" + rs.getString(1));
                }
            } else {
                System.out.println(name + "\tok\t" + st.getUpdateCount());
            }
        } catch (SQLException e) {
            System.out.println(name + "\terror\t" + e.getSQLState() + "\t" + e.getMessage().replace('\n', ' '));
        }
    }

    public static void main(String[] args) throws SQLException {
        try (Connection conn = DriverManager.getConnection(args[0], args[1], args[2])) {
            step(conn, "parameterised", "select name from clientm.customers where id = ?", 1);
            step(conn, "masked", "select email from clientm.customers where id = 1", null);
            step(conn, "denied", "select * from clientm.salaries", null);
            step(conn, "approval", "delete from clientm.payouts", null);
            step(conn, "after", "select count(*) from clientm.payouts", null);
        }
    }
}
